"""A pod's SDK across agent restarts: one botocore InstanceMetadataFetcher, asked for the
pod's role credentials in a loop until the file named by STOP_FILE exists.

The metadata endpoint comes from AWS_EC2_METADATA_SERVICE_ENDPOINT. The fetcher is
botocore's own, with its defaults (1 s timeout, 1 attempt), as the credential chain builds
it. Prints one JSON line: how many calls got credentials, and each failure's text.
"""

import json
import logging
import os
import sys
import time

from botocore.utils import InstanceMetadataFetcher


class Last(logging.Handler):
    """Keeps botocore's last debug line: it returns {} on a failure and logs why."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.text = ""

    def emit(self, record):
        self.text = record.getMessage()


def main() -> int:
    last = Last()
    logger = logging.getLogger("botocore.utils")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(last)
    fetcher = InstanceMetadataFetcher(
        timeout=1, num_attempts=1, base_url=os.environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"]
    )
    served, failures = 0, []
    while not os.path.exists(os.environ["STOP_FILE"]):
        last.text = ""
        try:
            credentials = fetcher.retrieve_iam_role_credentials()
        except Exception as error:  # noqa: BLE001 - every failure is what the test counts
            credentials, reason = {}, repr(error)
        else:
            reason = last.text or "no credentials"
        if credentials.get("access_key"):
            served += 1
        else:
            failures.append(reason)
        time.sleep(0.005)
    print(json.dumps({"served": served, "failures": failures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
