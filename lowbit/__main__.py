from lowbit.cli import main

main()
