"""The benchmark harness as a script: same as ``python -m fusedopt.bench`` (see its --help)."""

from fusedopt.bench import main

if __name__ == "__main__":
    main()
