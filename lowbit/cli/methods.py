"""lowbit methods: every quantization method the commands take, from the format registry."""
from __future__ import annotations

from lowbit.cli.common import app, console, friendly, setup


@app.command()
@friendly
def methods() -> None:
    """List every method --method and --methods take: its name, what it does, and the options it takes.

    Example: lowbit methods
    """
    setup()
    from rich.table import Table

    from lowbit import registry
    from lowbit.app.methods import methods as all_methods
    from lowbit.app.methods import option_fields

    suffixed = registry.suffixed_names()
    table = Table(title=f"methods (* {', '.join(suffixed)}: the bits and group size follow the name, as in "
                        f"{suffixed[-1]}3 or {suffixed[0]}4-g64)" if suffixed else "methods")
    for column in ("method", "what it does", "options"):
        table.add_column(column)
    for name, help_line in all_methods().items():
        options = " ".join(f"--{o.replace('_', '-')}" for o in option_fields(name))
        table.add_row(name + (" *" if name in registry.suffixed_names() else ""), help_line, options)
    console.print(table)
