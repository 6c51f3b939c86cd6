# Sourced at the start of a command on the lent GPU machine (Python 3.12, its own torch and CUDA):
# installs the wheels that bench/fetch_wheels.sh put in .whl/ beside the machine's torch, and puts
# this checkout's package first on the path.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
# A fresh install gives ModelOpt's C++/CUDA sources today's time, so ninja would rebuild a carried
# extension cache (.devcache/ext.tgz) for about two minutes; dated back, the carried build is up to date.
find /tmp/site/modelopt -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) \
  -exec touch -d '2001-01-01' {} +
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
