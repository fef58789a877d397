"""Build a corpus: read the sources into Parquet, train the tokenizer, print the data report.

    python jobs/corpus.py --config jobs/configs/corpus/tiny.yaml
    python jobs/corpus.py --config jobs/configs/corpus/tiny.yaml tokenizer.vocab_size=4096 corpus.root=/mnt/data

The pipeline's first stage; its tokenizer is the one pretraining uses (tokenizer.path).
"""

import sys

from ray_med.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, "corpus")


if __name__ == "__main__":
    sys.exit(main())
