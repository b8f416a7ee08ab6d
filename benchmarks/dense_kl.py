"""Dense-KL benchmark table: a thin wrapper of `python -m hybridlab.bench dense` (same arguments).

python benchmarks/dense_kl.py                  # the issue's grid on a CUDA GPU, tiny sizes on CPU
python benchmarks/dense_kl.py --cpu            # force the CPU mode
python benchmarks/dense_kl.py --sizes 4096:152064 --dtype bf16 --no-fused
"""

import sys

from hybridlab.bench import main

if __name__ == "__main__":
    main(["dense", *sys.argv[1:]])
