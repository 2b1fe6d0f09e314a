"""`make lab` really starts JupyterLab serving the notebooks (started, queried, stopped)."""

import json
import urllib.request

from lab_server import ROOT, make_lab


def test_make_lab_serves_the_notebooks(tmp_path):
    with make_lab(tmp_path, timeout=120) as (base, token):
        request = urllib.request.Request(f"{base}/api/contents/", headers={"Authorization": f"token {token}"})
        listing = json.load(urllib.request.urlopen(request, timeout=30))
        names = {item["name"] for item in listing["content"]}
        expected = {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
        assert expected and expected <= names, (expected, names)
        kernels = json.load(urllib.request.urlopen(urllib.request.Request(
            f"{base}/api/kernelspecs", headers={"Authorization": f"token {token}"}), timeout=30))
        assert "big-model-inference" in kernels["kernelspecs"], kernels["kernelspecs"].keys()
