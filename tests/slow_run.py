"""Run a pipeline command slowed down: ``python tests/slow_run.py DELAY COMMAND ARGS ...``.

The crash and lock tests need a real process that is still writing when they kill it
or race it, on any machine.  The delay goes in through the writers' own callbacks
(``on_block`` of distances and k-NN, ``on_iteration`` of a gmm fit): each recorded
block, piece or iteration is followed by a sleep of DELAY seconds.  The arguments are
parsed by pipeline's own parser and run inside :func:`pipeline.runtime.connect`, as
the ``pipeline`` command runs them.
"""

from __future__ import annotations

import sys
import time

from pipeline.cli import build_parser
from pipeline.distances import write_distances
from pipeline.mixture import fit_to_store
from pipeline.neighbors import write_knn
from pipeline.runtime import connect, limit_malloc


def main(argv):
    delay, a = float(argv[0]), build_parser().parse_args(argv[1:])

    def pause(*_):
        time.sleep(delay)

    limit_malloc()  # as the pipeline command does
    with connect(a.scheduler, workers=a.workers, threads_per_worker=a.threads_per_worker,
                 memory_budget=a.memory_budget, progress=False):
        if a.command == "distances":
            summary = write_distances(a.query, a.train, a.out, metric=a.metric, memory_budget=a.memory_budget,
                                      overwrite=a.overwrite, on_block=pause)
        elif a.command == "knn":
            summary = write_knn(a.query, a.train, a.out, k=a.k, weights=a.weights, memory_budget=a.memory_budget,
                                overwrite=a.overwrite, piece_rows=a.piece_rows, on_block=pause)
        elif a.command == "gmm" and a.action == "fit":
            summary = fit_to_store(a.data, a.model, n_components=a.n_components, max_iter=a.max_iter, tol=a.tol,
                                   reg_covar=a.reg_covar, init_params=a.init, random_state=a.seed,
                                   memory_budget=a.memory_budget, overwrite=a.overwrite, on_iteration=pause)
        else:
            raise SystemExit(f"slow_run: no slow form of {a.command}")
    for key, value in summary.items():
        print(f"{key}: {value}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
