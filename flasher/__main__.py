from flasher.cli import main

main(prog_name="flasher")
