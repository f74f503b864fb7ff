"""Loss ids of the two engines; must match csrc/common/pair_math.h."""
# pair engine (tiles of S = q r^T)
MULTI_SIMILARITY = 0
CIRCLE = 1
# class engine (tiles of whole classes of w)
SOFT_TRIPLE = 0
PROXY_CIRCLE = 1
