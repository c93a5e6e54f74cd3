from lowbit.weight_report import main

main()
