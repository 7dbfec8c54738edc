from vmtool.cli.main import entry

entry()
