from train.eval.cli import main

main()
