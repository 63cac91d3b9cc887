"""The session's local Ray: started in-process with oversubscribed logical CPUs."""

import ray


def test_local_ray_runs_tasks_with_oversubscribed_cpus(ray_local, settings):
    assert ray.is_initialized()
    assert ray_local["CPU"] == settings.ray.num_cpus == 8

    @ray.remote(num_cpus=1)
    def square(x: int) -> int:
        return x * x

    assert ray.get([square.remote(i) for i in range(8)], timeout=120) == [i * i for i in range(8)]
