"""Kubernetes integration tests: a real kube-apiserver on etcd, and a stand-in for the kubelet."""
