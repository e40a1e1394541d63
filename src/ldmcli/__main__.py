from ldmcli.cli import cli

cli()
