"""A pod's view: botocore's default credential chain, then STS GetCallerIdentity.

The metadata endpoint comes from AWS_EC2_METADATA_SERVICE_ENDPOINT and STS from STS_URL.
Prints one JSON line: the provider botocore used, the caller ARN and the access key ID.
Exits 3 when the chain finds no credentials.
"""

import json
import os
import sys

import botocore.session


def main() -> int:
    session = botocore.session.get_session()
    credentials = session.get_credentials()
    if credentials is None:
        print(json.dumps({"error": "no credentials"}))
        return 3
    frozen = credentials.get_frozen_credentials()
    sts = session.create_client("sts", region_name="us-east-1", endpoint_url=os.environ["STS_URL"])
    identity = sts.get_caller_identity()
    print(json.dumps({"method": credentials.method, "arn": identity["Arn"], "access_key": frozen.access_key}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
