"""Sinkhorn on flat ranges cut anywhere (DeepSpeed ZeRO's partitions) with one all-reduce per
iteration, the rows that straddle a partition completed in the first: every rank simulated in
one process, the all-reduce a sum over them, against the whole matrix."""
import pytest
import torch

from sage_dist import ops
from sage_dist.ops.span import Span
from sage_dist.optim.sinkhorn import sinkhorn_scales
from sage_dist.shard.fragment import Fragment
from sage_dist.shard.zero import Member, cuts_of

ITERS = 5


def fragment(R, C, a, b, g, straddle):
    return Fragment(name="w", param=None, shape=(R, C), span=Span(R, C, a, b), data=None,
                    grad=g[a:b], whole=False, rows_local=False, straddle_rows=straddle)


def ranks_in_lockstep(g, R, C, bounds, row_t=1.0, col_t=1.0):
    """Each rank's Sinkhorn generator on its range [bounds[k-1], bounds[k]); every phase's
    requests summed over the ranks (flags: max), as the engine's one all-reduce does.
    Returns ([(r, c)] per rank, phases, [phase-0 flag] per rank)."""
    edges = [0, *bounds, R * C]
    straddle = Member("w", (R, C), 0, 0, 0, cuts=cuts_of(0, R * C, bounds)).straddle_rows()
    gens = [sinkhorn_scales(fragment(R, C, a, b, g, straddle), g[a:b], ITERS, 1e-8, row_t,
                            col_t) for a, b in zip(edges, edges[1:])]
    reqs = [next(x) for x in gens]
    flags = [float(r[0][1]) for r in reqs]
    phases, results = 0, [None] * len(gens)
    while results[0] is None:
        phases += 1
        kinds = [kind for kind, _ in reqs[0]]
        assert all([kind for kind, _ in r] == kinds for r in reqs)  # one buffer layout
        summed = [torch.stack([r[k][1] for r in reqs]).sum(0) for k in range(len(kinds))]
        answers = [t for kind, t in zip(kinds, summed) if kind != "nonfinite"]
        nxt = []
        for k, x in enumerate(gens):
            try:
                nxt.append(x.send([t.clone() for t in answers]))
            except StopIteration as done:
                results[k] = done.value
        assert all(v is None for v in results) or all(v is not None for v in results)
        reqs = nxt
    return results, phases, flags


CUTS = [
    [3],             # inside row 0
    [14],            # between rows: nothing straddles
    [10, 12],        # a range inside one row
    [7, 7, 20],      # an empty range, one starting on a row
    [1, 2, 3, 30],   # several ranges inside row 0, one inside the last row
    [6, 8, 15, 22, 29],
]


@pytest.mark.parametrize("bounds", CUTS, ids=str)
@pytest.mark.parametrize("targets", [(1.0, 1.0), (7 ** 0.5, 5 ** 0.5)], ids=["sinkhorn", "sinkgd"])
def test_one_reduce_per_iteration_matches_the_whole_matrix(bounds, targets):
    R, C = 5, 7
    g = torch.randn(R * C, generator=torch.Generator().manual_seed(len(bounds)))
    results, phases, flags = ranks_in_lockstep(g, R, C, bounds, *targets)
    assert phases == ITERS
    assert flags == [0.0] * len(flags)
    r_want, c_want = ops.sinkhorn_scales(g, R, C, ITERS, 1e-8, *targets)
    edges = [0, *bounds, R * C]
    for (r, c), a, b in zip(results, edges, edges[1:]):
        assert torch.equal(c, results[0][1])     # every rank holds the same column scales
        torch.testing.assert_close(c, c_want, rtol=1e-6, atol=0)
        rows = slice(a // C, -(-b // C)) if b > a else slice(0, 0)
        torch.testing.assert_close(r[rows], r_want[rows], rtol=1e-6, atol=0)
    # a row two ranks hold in part gets the same scale on both
    shared = {e // C for e in bounds if e % C}
    for row in shared:
        holders = [r[row] for (r, _), a, b in zip(results, edges, edges[1:])
                   if a < b and a // C <= row <= (b - 1) // C]
        assert all(torch.equal(h, holders[0]) for h in holders)


def test_larger_matrix_random_cuts():
    R, C = 37, 19
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(R * C, generator=gen) * torch.rand(R, 1, generator=gen).repeat(1, C).view(-1)
    bounds = sorted(torch.randint(0, R * C, (6,), generator=gen).tolist())
    results, phases, _ = ranks_in_lockstep(g, R, C, bounds)
    assert phases == ITERS
    r_want, c_want = ops.sinkhorn_scales(g, R, C, ITERS, 1e-8, 1.0, 1.0)
    for r, c in results:
        torch.testing.assert_close(c, c_want, rtol=1e-6, atol=0)


def test_nonfinite_in_a_straddling_piece_is_flagged_by_its_rank():
    R, C = 5, 7
    g = torch.randn(R * C, generator=torch.Generator().manual_seed(0))
    g[2] = float("nan")  # rank 0 holds [0, 3): row 0 in part, the NaN in that piece only
    _, _, flags = ranks_in_lockstep(g, R, C, [3])
    assert flags == [1.0, 0.0]


def test_a_cut_row_the_layout_did_not_list_is_refused():
    R, C = 5, 7
    g = torch.randn(R * C)
    gen = sinkhorn_scales(fragment(R, C, 3, 35, g, ()), g[3:], ITERS, 1e-8, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="row 0 is held here in part"):
        next(gen)


def test_member_straddle_rows():
    # a [4, 10] member at flat offset 5 of a group flat cut at 20 and 40: its elements 15
    # (row 1, mid-row) and 35 (row 3, mid-row); a cut at flat 25 would fall between rows 1, 2
    m = Member("w", (4, 10), 0, 0, 0, cuts=cuts_of(5, 40, [20, 40]))
    assert m.cuts == (15, 35) and m.straddle_rows() == (1, 3)
    assert Member("w", (4, 10), 0, 0, 0, cuts=cuts_of(5, 40, [25])).straddle_rows() == ()
