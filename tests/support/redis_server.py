from dicom_node.local_stack.redis_server import RedisServer  # noqa: F401  (re-exported for tests)
