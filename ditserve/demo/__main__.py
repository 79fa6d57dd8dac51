"""``python -m ditserve.demo <train|eval|gallery|redundancy> ...``"""

from ditserve.demo.cli import main

main()
