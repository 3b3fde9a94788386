"""C-STORE response statuses the node returns, one per distinct failure, so a sender's log says what was wrong."""

SUCCESS = 0x0000
# Warning: received but handled differently than the sender might expect (PS3.4 B.2.3 allows B0xx warnings)
WARNING_DUPLICATE_CONFLICT = 0xB007  # same SOP Instance UID, different bytes, kept the first copy

OUT_OF_RESOURCES = 0xA700  # disk below the free-space threshold
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # dataset SOP Class/Instance UID disagrees with the C-STORE request
DUPLICATE_SOP_INSTANCE = 0x0111  # duplicate policy "reject"

# 0xCxxx: "Cannot understand", one code per reason
MISSING_UID = 0xC001  # Study/Series/SOP Instance UID absent
INVALID_UID = 0xC002  # not a valid UID (e.g. path characters)
MALFORMED_DATASET = 0xC003  # truncated or undecodable
MEDIA_DIRECTORY_REFUSED = 0xC004  # DICOMDIR is a media object, not a network one
PROCESSING_FAILURE = 0x0110  # unexpected error while storing; the sender may retry
