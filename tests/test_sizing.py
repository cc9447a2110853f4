"""Engine defaults that fit the hardware, and jobs that ask for more than the cluster has (no engine started)."""

from __future__ import annotations

from slmbatch import Classify, Frontier, Job, Model, ParquetSink, ParquetSource
from slmbatch.engine import default_cpu_dtype, engine_kwargs
from slmbatch.runner import resource_warnings, write_concurrency

NO_BF16 = "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sse sse2 ssse3 fma avx avx2 avx512f avx512bw avx512vl\n"
AVX512_BF16 = NO_BF16.rstrip() + " avx512_bf16 avx512_vnni\n"
AMX = NO_BF16.rstrip() + " amx_bf16 amx_tile amx_int8\n"
ARM = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16 i8mm\n"


def test_cpu_dtype_is_bf16_only_where_the_processor_computes_it():
    assert default_cpu_dtype(NO_BF16) == "float32"  # avx512f alone emulates bf16: ~10x slower
    assert default_cpu_dtype(AVX512_BF16) == "bfloat16"
    assert default_cpu_dtype(AMX) == "bfloat16"
    assert default_cpu_dtype(ARM) == "bfloat16"
    assert default_cpu_dtype("") == "float32"


def test_the_job_dtype_wins_over_the_default_and_gpus_keep_vllms_own():
    assert engine_kwargs(Model("m"))["dtype"] == default_cpu_dtype()
    assert engine_kwargs(Model("m", engine={"dtype": "bfloat16"}))["dtype"] == "bfloat16"
    assert "dtype" not in engine_kwargs(Model("m", num_gpus=1))


def job(*models: Model, frontier: Frontier | None = None) -> Job:
    return Job(
        name="sizing",
        source=ParquetSource("in", columns=["text"]),
        stages=[
            Classify(f"c{i}", model=m, input="text", labels=["a", "b"], threshold=0.5 if frontier else None)
            for i, m in enumerate(models)
        ],
        sink=ParquetSink("out"),
        frontier=frontier,
    )


def test_a_job_that_fits_gets_no_warning():
    fits = job(Model("a", num_cpus=1), Model("b", num_cpus=0.5))
    assert resource_warnings(fits, {"CPU": 2.0}) == []


def test_a_job_that_asks_for_more_than_the_cluster_has_is_told_what_and_how_much():
    big = job(Model("a", replicas=3, num_cpus=1), Model("b", num_cpus=0, num_gpus=1))
    cpu, gpu, threads = resource_warnings(big, {"CPU": 2.0})
    assert cpu.startswith("the job reserves 3.25 CPUs") and "the cluster has 2" in cpu
    assert gpu.startswith("the job asks for 1 GPUs") and "the cluster has 0" in gpu
    assert threads.startswith("the job's CPU replicas run 3 engine threads on 2 CPUs")


def test_more_engine_threads_than_cores_is_a_warning_even_when_the_reservations_fit():
    (warning,) = resource_warnings(job(Model("a", num_cpus=0.5, threads=2), Model("b", num_cpus=0.5)), {"CPU": 2.0})
    assert warning.startswith("the job's CPU replicas run 3 engine threads on 2 CPUs")


def test_write_tasks_run_two_per_replica_and_never_more_than_the_blocks_the_stages_return():
    def units(n: int, rows: int) -> list[dict]:
        return [{"rows": rows}] * n

    three = job(Model("a", replicas=3, batch_size=10))
    assert write_concurrency(three, units(100, 10)) == 6  # two per replica
    # A block reaching the writer holds at most the largest unit plus each step's batch (10 + 10
    # rows), so 30 rows come in at least 2 blocks, and Ray Data warns about a limit above its inputs.
    assert write_concurrency(three, units(3, 10)) == 2
    assert write_concurrency(three, units(1, 1)) == 1
    # Routed rows pass a frontier step too, which bundles once more: 30 rows may be one block.
    routed = job(Model("a", replicas=3, batch_size=10), frontier=Frontier(base_url="http://127.0.0.1:1/v1", model="f"))
    assert write_concurrency(routed, units(3, 10)) == 1
