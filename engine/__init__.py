"""The engine every study shares: the stacked engine (stack), one function that builds a run (build), the
runner (runner), the results store (results) and what every command line shares (cli)."""
