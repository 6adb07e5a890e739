"""CPU optimizer-step comparison used for the native CPU kernels' targets (issue 3): 16M fp32
parameters in 8 tensors, Adam, AdamW and RMSprop, fusedopt's ``"cpu"`` backend against torch.optim's
variants, 31 interleaved rounds. A preset of the shared harness, ``python -m fusedopt.bench``.

    python3 benchmarks/cpu_step.py [extra fusedopt.bench flags]
"""

import sys

from fusedopt.bench import main

if __name__ == "__main__":
    main(
        [
            "--device",
            "cpu",
            "--preset",
            "uniform-16m",
            "--optimizer",
            "adam",
            "--optimizer",
            "adamw",
            "--optimizer",
            "rmsprop",
            "--backend",
            "cpu",
            "--repeats",
            "31",
            *sys.argv[1:],
        ]
    )
