"""Finding Fashion-MNIST where Debian's dataset-fashion-mnist package installs it."""

from __future__ import annotations

from gradkit.data.mnist import debian_fashion_mnist


def test_debian_fashion_mnist_reads_the_package_listing(tmp_path, monkeypatch):
    data = tmp_path / "share" / "fashion"
    data.mkdir(parents=True)
    (data / "train-images-idx3-ubyte.gz").write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "dpkg"
    fake.write_text(
        "#!/bin/sh\n"
        '[ "$2" = dataset-fashion-mnist ] || exit 1\n'
        f"echo {data}\necho {data / 'train-images-idx3-ubyte.gz'}\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert debian_fashion_mnist() == data
    assert debian_fashion_mnist("no-such-package") is None
