"""A real kube-apiserver (``apiserver``), a kubelet stand-in that runs Jobs as local processes
(``kubelet``) and a namespace set up as ``deploy`` would (``cluster``), for tests and benchmarks."""
