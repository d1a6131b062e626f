"""Turn a pytest-benchmark JSON file into the markdown table committed under benchmarks/results/.

    python benchmarks/table.py RESULTS.json > benchmarks/results/NAME.md
"""

import json
import platform
import sys


def main(path):
    with open(path) as handle:
        data = json.load(handle)
    machine = data["machine_info"]
    print(f"# {data['datetime'][:10]}: ops forward+backward, ours vs stock PyTorch")
    print()
    print(f"- machine: {machine.get('cpu', {}).get('brand_raw', platform.processor())}, "
          f"python {machine['python_version']}, {machine.get('system')} {machine.get('release')}")
    torch_version = next((b["extra_info"].get("torch") for b in data["benchmarks"]), "?")
    print(f"- torch {torch_version}; median of the rounds; each round = one forward + backward")
    print()
    print("| case | implementation (backend) | median ms | IQR ms | vs stock |")
    print("|---|---|---|---|---|")
    groups = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench["group"], []).append(bench)
    for group, benches in sorted(groups.items()):
        stock = next((b["stats"]["median"] for b in benches if b["extra_info"]["backend"] == "stock"), None)
        for bench in sorted(benches, key=lambda b: b["extra_info"]["backend"] == "stock"):
            median = bench["stats"]["median"]
            ratio = f"{median / stock:.2f}x time" if stock else "-"
            impl = "stock" if bench["extra_info"]["backend"] == "stock" else f"deepatlas_fast ({bench['extra_info']['backend']})"
            print(f"| {group} | {impl} | {median * 1e3:.2f} | {bench['stats']['iqr'] * 1e3:.2f} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
