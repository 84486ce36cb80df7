"""Which shards a process embeds: pattern / list file / directory resolution and rank partitioning."""

import pytest

from dmt_jepa.serve.inputs import InputError, ShardSource, partition, resolve_inputs, resolve_rank, shard_name


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_brace_pattern_in_order(tmp_path):
    for i in range(3):
        touch(tmp_path / f"s-{i:03d}.tar")
    shards = resolve_inputs(str(tmp_path / "s-{000..002}.tar"))
    assert [s.name for s in shards] == ["s-000", "s-001", "s-002"]
    assert shards[1].url == str(tmp_path / "s-001.tar")


def test_directory_takes_shards_only_sorted(tmp_path):
    for name in ["b.tar", "a.tar", "c.tar.gz", "notes.txt"]:
        touch(tmp_path / name)
    assert [s.name for s in resolve_inputs(str(tmp_path))] == ["a", "b", "c"]


def test_list_file_relative_to_itself_with_comments(tmp_path):
    touch(tmp_path / "data" / "x.tar")
    listing = tmp_path / "data" / "shards.txt"
    listing.write_text("# shards\n\nx.tar\nhttps://host/bucket/y.tar?sig=1\npipe:curl -s https://h/z.tgz\n")
    shards = resolve_inputs(str(listing))
    assert shards == [
        ShardSource(str(tmp_path / "data" / "x.tar"), "x"),
        ShardSource("https://host/bucket/y.tar?sig=1", "y"),
        ShardSource("pipe:curl -s https://h/z.tgz", "z"),
    ]


@pytest.mark.parametrize(
    "make, spec, words",
    [
        (lambda p: None, "none-{0..3}.tar", "matches no existing shard"),
        (lambda p: touch(p / "s-0.tar"), "s-{0..2}.tar", "2 of the 3 shards"),
        (lambda p: (p / "empty").mkdir(), "empty", "holds no .tar shards"),
        (lambda p: (p / "list.txt").write_text("# nothing\n"), "list.txt", "names no shards"),
        (lambda p: (touch(p / "a" / "s.tar"), touch(p / "b" / "s.tar")), ["a", "b"], "share the name s"),
    ],
)
def test_unusable_input_is_one_clear_error(tmp_path, make, spec, words):
    make(tmp_path)
    spec = [str(tmp_path / s) for s in spec] if isinstance(spec, list) else str(tmp_path / spec)
    with pytest.raises(InputError, match=words):
        resolve_inputs(spec)


def test_shard_names():
    assert shard_name("/d/train-0001.tar") == "train-0001"
    assert shard_name("s3://b/p/x.tar.gz") == "x"
    assert shard_name("pipe:aws s3 cp s3://b/k/y.tgz -") == "y"


@pytest.mark.parametrize(
    "flags, env, expected",
    [
        ((None, None), {}, (0, 1)),
        ((None, None), {"RANK": "3", "WORLD_SIZE": "4"}, (3, 4)),
        ((None, None), {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (1, 2)),
        ((None, None), {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (0, 2)),
        ((2, 5), {"RANK": "0", "WORLD_SIZE": "2"}, (2, 5)),
    ],
)
def test_rank_sources_in_priority_order(flags, env, expected):
    assert resolve_rank(*flags, env=env) == expected


@pytest.mark.parametrize("flags, env", [((2, 2), {}), ((0, None), {}), ((None, None), {"RANK": "a", "WORLD_SIZE": "2"})])
def test_bad_rank_settings(flags, env):
    with pytest.raises(InputError):
        resolve_rank(*flags, env=env)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 20])
def test_partition_covers_every_shard_exactly_once(world_size):
    shards = [ShardSource(f"s{i}.tar", f"s{i}") for i in range(13)]
    seen = [s for rank in range(world_size) for s in partition(shards, rank, world_size)]
    assert sorted(seen, key=lambda s: s.name) == sorted(shards, key=lambda s: s.name)
    sizes = [len(partition(shards, r, world_size)) for r in range(world_size)]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("env, gpu", [({}, 0), ({"LOCAL_RANK": "3"}, 3), ({"SLURM_LOCALID": "1"}, 1), ({"LOCAL_RANK": "x"}, 0)])
def test_local_gpu_follows_the_launcher(env, gpu):
    from dmt_jepa.serve.backends import local_gpu

    assert local_gpu(env) == gpu
