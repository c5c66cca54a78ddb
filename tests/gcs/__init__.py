"""Google Cloud Storage on loopback for tests and benchmarks: fake-gcs-server and a fault-injecting proxy."""
