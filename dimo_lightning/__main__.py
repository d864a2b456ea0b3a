from dimo_lightning.commands.cli import main

main()
