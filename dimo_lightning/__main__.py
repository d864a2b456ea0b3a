from dimo_lightning.cli import main

main()
