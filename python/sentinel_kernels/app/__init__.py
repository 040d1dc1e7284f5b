"""The applications around the library: the ``sentinel-kernels`` command (:mod:`.cli`,
:mod:`.args`), the demo (:mod:`.demo`), the profiler (:mod:`.profile`) and the benchmark
report (:mod:`.bench_report`, ``python -m sentinel_kernels.app.bench_report``).

They sit above the library core and nothing in the core imports them. Importing this
package imports nothing else (the CLI's ``--help`` stays torch-free).
"""
