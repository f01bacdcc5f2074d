from parley.brain.knowledge.bench import bench_retrieval


async def test_bench_retrieval_runs_on_a_small_corpus(database_url: str) -> None:
    result = await bench_retrieval(database_url, chunks=300, queries=20, warmup=5)
    assert result.chunks >= 300 and len(result.samples_ns) == 20
    assert 0 < result.percentile_ms(50) <= result.percentile_ms(99)
    assert "queries over" in result.summary()
