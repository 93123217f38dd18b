set -uo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/python CC=/usr/bin/gcc CXX=/usr/bin/g++ PYTHONUNBUFFERED=1
export LONGCTX_KERNELS=kvcache,flash_fwd,rope LONGCTX_HEADDIMS=64,128,256 LONGCTX_DTYPES=bf16,fp16 LONGCTX_DISABLE_NCCL=1 MAX_JOBS=16
t=$(date +%s); python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || { grep -B2 -A6 error /tmp/build.log | head -60; exit 1; }; echo "build $(( $(date +%s) - t )) s"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
python3 scripts/dev/decode_ab.py --slot-scales --formats int8 --ctx 32768,131072 --batch 1 --rounds 10 2>&1 | tee $OUT/ab_b1.txt
python3 scripts/dev/decode_ab.py --slot-scales --formats int8 --ctx 32768,131072 --batch 16 --rounds 4 2>&1 | tee $OUT/ab_b16.txt
t=$(date +%s); python3 -m pytest tests/test_kvcache_gpu.py -q -x -p no:cacheprovider -k "int8 and (decode or append or written)" > $OUT/pytest.txt 2>&1; echo "pytest rc $? $(( $(date +%s) - t )) s"; tail -3 $OUT/pytest.txt
