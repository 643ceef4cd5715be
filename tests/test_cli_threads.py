"""The rule for the CLI's CPU threads (cli.cpu_threads), as a function of its inputs."""
from __future__ import annotations

import pytest

from mllama.cli import CliError, cpu_threads


def threads(flag=None, env=None, cpus=2, physical=2, online=2, load=0.0):
    return cpu_threads(flag, env or {}, cpus=cpus, physical=physical, online=online, load=load)


def test_the_flag_wins_over_the_environment_and_the_load():
    assert threads(3, {"MLLAMA_NUM_THREADS": "2", "OMP_NUM_THREADS": "5"}, load=9.0) == 3


def test_then_mllama_num_threads_then_omp_num_threads():
    assert threads(env={"MLLAMA_NUM_THREADS": "2", "OMP_NUM_THREADS": "5"}, load=9.0) == 2
    assert threads(env={"OMP_NUM_THREADS": "5"}, load=9.0) == 5
    assert threads(env={"OMP_NUM_THREADS": "4,2"}) == 4  # OpenMP's nested list: the outer level
    assert threads(env={"OMP_NUM_THREADS": " ", "MLLAMA_NUM_THREADS": ""}, cpus=8, physical=8, online=8) == 8


@pytest.mark.parametrize("value", ["x", "0", "-2", "1.5"])
def test_a_bad_environment_value_is_named(value):
    with pytest.raises(CliError, match=rf"MLLAMA_NUM_THREADS='{value}'.*whole number"):
        threads(env={"MLLAMA_NUM_THREADS": value})


def test_an_idle_machine_gets_its_physical_cores():
    assert threads(cpus=8, physical=4, online=8, load=0.0) == 4
    assert threads(cpus=2, physical=2, online=2, load=0.3) == 2


def test_cpus_the_load_keeps_busy_are_left_out_but_one_thread_remains():
    assert threads(cpus=2, physical=2, online=2, load=1.0) == 1
    assert threads(cpus=8, physical=8, online=8, load=5.0) == 3
    assert threads(cpus=2, physical=2, online=2, load=7.0) == 1


def test_the_load_is_shared_over_the_whole_machine():
    # 2 of 16 CPUs available: a load of 4 on the machine is half a CPU of ours, 8 is one
    assert threads(cpus=2, physical=2, online=16, load=4.0) == 2
    assert threads(cpus=2, physical=2, online=16, load=8.0) == 1
