import lowbit.functional as F
from lowbit.app.weight_report import FORMATS, weight_report


def test_weight_report_on_real_weights(real_weights):
    rows = {r.fmt: r for r in weight_report(real_weights, FORMATS, progress=False)}
    assert set(rows) == set(FORMATS)
    # More bits, less error; NF4 beats FP4 on normally distributed weights (QLoRA's finding).
    assert rows["int8"].rel_error < rows["nf4"].rel_error < rows["fp4"].rel_error < rows["ternary"].rel_error
    assert rows["int3-g64"].rel_error > rows["int4-g64"].rel_error
    assert abs(rows["nf4-dq"].rel_error - rows["nf4"].rel_error) < 0.01
    n = sum(w.numel() for w in real_weights.values())
    expected = sum(F.bits_per_param("nf4", tuple(w.shape), 64, True) * w.numel() for w in real_weights.values()) / n
    assert rows["nf4-dq"].bits_per_param == expected
    assert rows["nf4"].bits_per_param == 4.5
