"""The cluster rehearsal: k8s/ and the packaged workflows run for real on one machine."""
