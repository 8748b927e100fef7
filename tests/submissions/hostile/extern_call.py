"""A kernel whose TIR calls an external C function (`system`) through T.call_extern.

The source text is a TileLang kernel with the card's signature; what it would
compile to reaches outside the kernel. The original grader scored its
signature; a grader that compiles what it is given must refuse it first.
"""

import tilelang.language as T

_solution_make_kernel = globals()["make_kernel"]


def make_kernel(seq_len, head_dim, window, *args, dtype="float16", **kwargs):
    @T.prim_func
    def sliding_window_attention(
        Q: T.Tensor((seq_len, head_dim), dtype),
        K: T.Tensor((seq_len, head_dim), dtype),
        V: T.Tensor((seq_len, head_dim), dtype),
        O: T.Tensor((seq_len, head_dim), "float32"),
    ):
        T.evaluate(T.call_extern("int32", "system", "touch /tmp/swattn-hostile-was-here"))
        with T.Kernel(T.ceildiv(seq_len, 64), threads=128) as bx:
            scratch = T.alloc_shared((64, head_dim), dtype)
            T.fill(scratch, 0)
            for i, j in T.Parallel(64, head_dim):
                if bx * 64 + i < seq_len:
                    O[bx * 64 + i, j] = T.float32(0)

    return sliding_window_attention
