"""Capacity profiles of node groups (issue 23 #5, docs/capacity.md "Node groups"): a [group]
table round-trips through TOML and is validated; the shipped group profiles load, cite their
sources and scale the single-Mac profile as their notes say; `fleetctl plan` names a group and
prices every machine of it; `fleetctl profile` at a real group's rank 0 writes the [group]
table from NodeStatus.group, and a follower rank is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import replace

import pytest
import typer
from typer.testing import CliRunner

from cluster.api import common_pb2, node_pb2
from cluster.capacity import costs
from cluster.capacity.profile import (
    PUBLISHED,
    GroupFacts,
    Info,
    Limits,
    ModelFacts,
    NodeFacts,
    Profile,
    ProfileError,
    StepModel,
    load_profile,
    reference_profiles,
)
from cluster.fleetctl import profile_cmd
from cluster.fleetctl.app import app
from cluster.localfleet import HARNESS_NODE_CALLER
from tests.group_helpers import make_group_model, start_group
from tests.procs import ROOT

SHIPPED = reference_profiles()
SINGLE = "qwen2.5-72b-instruct-4bit-m3-ultra-mlx"
JACCL2 = "qwen2.5-72b-instruct-4bit-m3-ultra-x2-jaccl-tensor-mlx"
JACCL4 = "qwen2.5-72b-instruct-4bit-gs32-m3-ultra-x4-jaccl-tensor-mlx"
RING2 = "qwen2.5-72b-instruct-4bit-m3-ultra-x2-ring-tensor-mlx"
FIT = StepModel(0.04, 0.002, 1e-6, 0.01, 0.003, 0.0)


def group_profile(**group) -> Profile:
    g = GroupFacts(**{"size": 2, "mode": "tensor", "backend": "jaccl", **group})
    return Profile(
        Info("g-72b", PUBLISHED, "2026-12-06T12:00:00Z", ("https://example.org/bench",)),
        NodeFacts("mlx", "Apple M3 Ultra", 512.0, group_size=g.size),
        ModelFacts("org/x", "", 72.7, "4bit"),
        Limits(32, 32768),
        FIT,
        group=g,
    )


def test_a_group_profile_round_trips_through_toml(tmp_path):
    p = group_profile(size=3, mode="pipeline", backend="ring", link="TCP", hosts=("a", "b", "c"))
    text = p.to_toml()
    assert "[group]" in text and 'backend = "ring"' in text
    back = load_profile(p.save(tmp_path / "g.toml"))
    assert back == p and back.group == p.group and back.machines == 3
    # [node] group_size may be left out: the [group] size gives it.
    lean = text.replace("group_size = 3\n", "")
    (tmp_path / "lean.toml").write_text(lean)
    assert load_profile(tmp_path / "lean.toml").node.group_size == 3


@pytest.mark.parametrize(
    "edit, problem",
    [
        (("\nsize = 2", "\nsize = 1"), "group.size: must be >= 2"),
        (('mode = "tensor"', 'mode = "data"'), "group.mode: must be one of tensor, pipeline"),
        (('backend = "jaccl"', 'backend = "nccl"'), "group.backend: must be one of ring, jaccl"),
        (("group_size = 2", "group_size = 4"), "node.group_size: is 4 but [group] size is 2"),
        (('mode = "tensor"', 'mode = "tensor"\nrankz = 2'), "group.rankz: unknown key"),
        (('mode = "tensor"', 'mode = "tensor"\nhosts = ["a"]'), "group.hosts: lists 1 hosts"),
    ],
)
def test_a_bad_group_table_is_refused_by_key(tmp_path, edit, problem):
    path = group_profile().save(tmp_path / "g.toml")
    path.write_text(path.read_text().replace(*edit, 1))
    with pytest.raises(ProfileError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        load_profile(path)


@pytest.mark.parametrize("stem", [JACCL2, JACCL4, RING2])
def test_the_shipped_group_profiles_load_and_cite_their_sources(stem):
    prof = load_profile(SHIPPED[stem])
    assert prof.info.provenance == PUBLISHED and prof.group is not None
    assert prof.machines == prof.group.size == prof.node.group_size
    assert (prof.group.mode, prof.node.chip) == ("tensor", "Apple M3 Ultra")
    cited = " ".join(prof.info.sources)
    if prof.group.backend == "jaccl":
        assert "github.com/exo-explore/exo" in cited and "speedup on 2 devices" in cited
    else:
        assert "github.com/ml-explore/mlx/issues/1046" in cited
    assert "derived" in prof.info.notes or "published claim" in prof.info.notes


def test_the_group_fits_are_the_single_mac_fit_scaled_as_published():
    """exo: 1.8x on 2 devices, 3.2x on 4 (after the 4-way split's 5-bit weights); ring: none."""
    one = load_profile(SHIPPED[SINGLE]).fit
    two, four, ring = (load_profile(SHIPPED[s]).fit for s in (JACCL2, JACCL4, RING2))
    assert one.decode_base_s / two.decode_base_s == pytest.approx(1.8, rel=0.01)
    assert one.decode_base_s * (45.4 / 40.9) / four.decode_base_s == pytest.approx(3.2, rel=0.01)
    assert ring.decode_base_s >= one.decode_base_s  # over TCP: no faster than one Mac
    for fit in (two, four, ring):  # prefill not scaled: nothing published
        assert fit.prefill_per_token_s == one.prefill_per_token_s
        assert fit.single_note_s(500, 500) > 8  # the clinic's bar is still out of reach


def test_costs_count_every_machine_of_a_group():
    prof = load_profile(SHIPPED[JACCL2])
    one_mac = costs.node_cost(replace(prof, group=None, node=replace(prof.node, group_size=1)))
    group = costs.node_cost(prof, node_cost_usd=11699, power_w=250, hosting_usd_month=30)
    assert group.machines == 2 and one_mac.machines == 1
    day = group.per_day()
    assert day["capital"] == pytest.approx(2 * 11699 / (24 * costs.DAYS_PER_MONTH))
    assert day["power"] == pytest.approx(2 * 0.25 * 24 * costs.DEFAULT_USD_PER_KWH)
    assert day["hosting"] == pytest.approx(2 * 30 / costs.DAYS_PER_MONTH)


def test_plan_names_the_group_and_prices_every_mac(tmp_path):
    res = CliRunner().invoke(
        app,
        [
            "plan",
            "--profile",
            f"{JACCL2}=3",
            "--notes-per-day",
            "1500",
            "--window-hours",
            "1",
            "--no-search",
            "--node-cost-usd",
            "11699",
            "--power-w",
            "250",
            "-o",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    fleet = doc["fleet"]
    assert (fleet["size"], fleet["machines"]) == (3, 6)
    assert fleet["groups"] == [
        {
            "profile": JACCL2,
            "size": 2,
            "mode": "tensor",
            "backend": "jaccl",
            "link": "Thunderbolt 5 RDMA",
            "chip": "Apple M3 Ultra",
            "count": 3,
            "machines": 6,
        }
    ]
    parts = doc["costs"]["fleet"]["fleet_usd_day_parts"]
    assert parts["capital"] == pytest.approx(6 * 11699 / (24 * costs.DAYS_PER_MONTH))
    assert parts["power"] == pytest.approx(6 * 0.25 * 24 * costs.DEFAULT_USD_PER_KWH)
    assert len(fleet["nodes"]) == 3  # one routing target per group
    text = CliRunner().invoke(
        app, ["plan", "--profile", f"{JACCL2}=3", "--notes-per-day", "1500", "--window-hours", "1"]
    )
    assert text.exit_code == 0, text.output
    assert (
        f"{JACCL2} is a node group: 2 x Apple M3 Ultra, tensor parallel over jaccl "
        "(Thunderbolt 5 RDMA), one routing target; 3 such = 6 machines" in text.stdout
    )
    assert "against this group's 2" in text.stdout  # the lever counts machines, not groups


def _group_status(rank: int) -> node_pb2.NodeStatus:
    st = node_pb2.NodeStatus(node_id="g0", lifecycle=common_pb2.LIFECYCLE_READY)
    st.group.size, st.group.rank, st.group.mode, st.group.backend = 2, rank, "tensor", "ring"
    for r, host in enumerate(("mac-a", "mac-b")):
        st.group.ranks.add(rank=r, address=f"10.0.0.{r + 1}:7790", hostname=host, health="ok")
    return st


def test_a_follower_rank_is_refused_with_where_to_profile():
    with pytest.raises(typer.Exit) as exc:
        profile_cmd._check_ready(_group_status(1), "10.0.0.2:7700")
    assert exc.value.exit_code == 2
    profile_cmd._check_ready(_group_status(0), "10.0.0.1:7700")  # rank 0 serves: measured


# A real 2-rank tensor group on the tiny model (ring backend, loopback), profiled with --quick
# --repeats 1 through rank 0's public interface, like any node: about 35 s here.
@pytest.mark.allow_blocking("starts real node processes and runs fleetctl")
def test_profile_at_a_real_groups_rank_0_writes_the_group_table(tmp_path):
    model = make_group_model(tmp_path / "model")
    out = tmp_path / "group.toml"
    with ExitStack() as stack:
        rank0, rank1 = start_group(stack, model, tmp_path / "logs", "tensor")
        status = rank0.status()
        cmd = [sys.executable, "-m", "cluster.fleetctl.app", "profile", "--node"]
        cmd += ["--tls-name", HARNESS_NODE_CALLER, "--quick", "--repeats", "1"]
        res = subprocess.run(
            [*cmd, "--target", rank0.address, "--out", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        follower = subprocess.run(
            [*cmd, "--target", rank1.address, "--out", str(tmp_path / "r1.toml")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert follower.returncode == 2 and "rank 1 of node group" in follower.stderr
    assert not (tmp_path / "r1.toml").exists()
    prof = load_profile(out)
    hosts = tuple(r.hostname for r in status.group.ranks)
    assert prof.group == GroupFacts(2, "tensor", "ring", "TCP (Ethernet or Thunderbolt IP)", hosts)
    assert prof.node.group_size == prof.machines == 2
    assert prof.node.node_id == status.node_id and prof.name.endswith("-group2-tensor-ring")
    assert "[group]" in out.read_text() and "node group: 2 machines" in prof.info.notes
    assert "node group   2 machines, tensor parallel over ring" in res.stdout
    assert prof.fit.decode_base_s > 0 and len(prof.curves.decode) >= 2
