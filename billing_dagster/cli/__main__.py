"""`python -m billing_dagster.cli`, as the tests and the demo run the command line."""

from billing_dagster.cli import main

if __name__ == "__main__":
    main()
