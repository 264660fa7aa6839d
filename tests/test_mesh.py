"""Mesh: named axes over the world; clear errors for sizes that do not fit it."""
import pytest
import torch
import torch.distributed as dist

from sharded import comm
from sharded.mesh import Mesh
from sharded.testing import get_pool


def test_one_process_is_a_one_rank_mesh_without_groups():
    mesh = Mesh.current()
    assert mesh.axes == {"pp": 1, "dp": 1, "ep": 1, "tp": 1} and mesh.world_size == 1
    assert mesh.device_mesh is None
    assert [mesh.rank(a) for a in ("pp", "dp", "ep", "tp")] == [0, 0, 0, 0]
    assert mesh.group("dp") is None
    assert repr(mesh) == "Mesh(pp=1, dp=1, ep=1, tp=1; rank 0 of 1)"


def test_sizes_that_do_not_fit_the_world_are_named():
    message = r"^Mesh\(dp=2\) has 2 ranks but the world has 1; pick sizes whose product is 1$"
    with pytest.raises(ValueError, match=message):
        Mesh(dp=2)
    with pytest.raises(ValueError, match=r"Mesh\(pp=3\) needs a world size divisible by pp\*tp\*ep = 3, but the world "
                       r"has 1; pick pp, tp and ep whose product divides 1"):
        Mesh(pp=3)
    with pytest.raises(ValueError, match=r"Mesh\(tp=0\): axis tp=0 must be a positive int"):
        Mesh(tp=0)


def test_unknown_axis_names_the_axes():
    with pytest.raises(KeyError, match="no mesh axis 'xp'; the axes are pp, dp, ep, tp"):
        Mesh().size("xp")


def _mesh_on_rank():
    errors = []
    for sizes in ({"dp": 3, "pp": 2}, {"pp": 3}):
        try:
            Mesh(**sizes)
        except ValueError as e:
            errors.append(str(e))
    default = Mesh.current()
    mesh = Mesh(pp=2)
    Mesh.set_current(mesh)  # the next job must see the default again (job isolation)
    x = torch.tensor([float(dist.get_rank())])
    comm.all_reduce(x, group=mesh.group("dp"))
    return {
        "errors": errors,
        "default": default.axes,
        "axes": mesh.axes,
        "coords": (mesh.rank("pp"), mesh.rank("dp"), mesh.rank("ep"), mesh.rank("tp")),
        "pp_ranks": dist.get_process_group_ranks(mesh.group("pp")),
        "dp_ranks": dist.get_process_group_ranks(mesh.group("dp")),
        "no_groups": (mesh.group("ep"), mesh.group("tp")),
        "dims": mesh.device_mesh.mesh_dim_names,
        "dp_sum": x.item(),
        "repr": repr(mesh),
    }


def test_2x2_pp_by_dp_mesh_on_4_ranks():
    pool = get_pool(4)
    results = pool.run(_mesh_on_rank)
    for r, got in enumerate(results):
        pp, dp = divmod(r, 2)  # row-major over (pp, dp, ep, tp): dp varies faster than pp
        assert got["errors"] == [
            "Mesh(dp=3, pp=2) has 6 ranks but the world has 4; pick sizes whose product is 4",
            "Mesh(pp=3) needs a world size divisible by pp*tp*ep = 3, but the world has 4; "
            "pick pp, tp and ep whose product divides 4",
        ]
        assert got["default"] == {"pp": 1, "dp": 4, "ep": 1, "tp": 1}
        assert got["axes"] == {"pp": 2, "dp": 2, "ep": 1, "tp": 1}
        assert got["coords"] == (pp, dp, 0, 0)
        assert got["pp_ranks"] == [dp, dp + 2]
        assert got["dp_ranks"] == [2 * pp, 2 * pp + 1]
        assert got["no_groups"] == (None, None)
        assert got["dims"] == ("pp", "dp")
        assert got["dp_sum"] == 2 * pp + 2 * pp + 1
        assert got["repr"] == f"Mesh(pp=2, dp=2, ep=1, tp=1; rank {r} of 4)"
    assert pool.run(lambda: Mesh.current().axes) == [{"pp": 1, "dp": 4, "ep": 1, "tp": 1}] * 4


def _links_on_rank():
    mesh = Mesh(pp=4)
    links = mesh.links("pp")
    me = dist.get_rank()
    for (sender, receiver), group in sorted(links.items()):  # each direction on its own group
        got = torch.full((1,), -1.0)
        comm.exchange([("send", torch.full((1,), float(me)), receiver) if me == sender else ("recv", got, sender)], group).wait()
        assert me == sender or got.item() == sender
    return sorted(links), len({id(g) for g in links.values()}), Mesh(pp=1).links("pp")


def test_links_are_one_group_per_direction_between_ring_neighbours():
    for rank, (links, groups, none) in enumerate(get_pool(4).run(_links_on_rank)):
        neighbours = {(rank + 1) % 4, (rank - 1) % 4}
        assert links == sorted({(rank, n) for n in neighbours} | {(n, rank) for n in neighbours})
        assert groups == 4 and none == {}
