"""Class-conditional quickstart: the quickstart's digits and network with the 10 digit classes and
classifier-free guidance (Ho & Salimans 2022), offline on a CPU.

    python train.py --config=configs/quickstart_cond.py --workdir=out/quickstart_cond
    python sample.py --workdir=out/quickstart_cond --out=out/quickstart_cond/guided \\
        --class_label=all --guidance=1 --num_samples=1000

Training is the quickstart's (configs/quickstart.py, about 8 minutes on this project's 2-core
CPU) with each label replaced by "no class" with probability 0.1 (their p_uncond); the grids
during training are guided at w = 1, one class per column. sample.py --class_label=all writes
a grid with one row per digit. What to expect, as tests/test_conditional.py measures it with a
classifier trained on the real digits: most guided samples (w = 1) are recognised as the digit
asked for, fewer at w = 0, and a tenth (chance) of the untrained network's.
"""

from configs import quickstart


def get_config():
    c = quickstart.get_config()
    c.model.num_classes = 10
    c.diffusion.cond_drop_prob = 0.1
    c.sample.guidance = 1.0
    return c
