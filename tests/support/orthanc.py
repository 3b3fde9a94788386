from dicom_node.local_stack.orthanc import Orthanc, require_private_network  # noqa: F401  (re-exported for tests)
