"""Local servers on loopback for the demo and the tests: Kafka, Tansu, Postgres, S3 (moto).

Each is a context manager that starts a real server on a free port in a throwaway
directory, waits until it answers, and stops it (also when the body raises).
"""
