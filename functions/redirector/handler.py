"""redirector: answers 302 to `$destination` (default https://google.com).

The local stand-in for the OpenFaaS conformance suite's redirector function (a golang-middleware
function, image theaxer/redirector), which checks that a redirect reaches the caller unfollowed.
"""

import os

DEFAULT_DESTINATION = "https://google.com"


def handle(event, context):
    """A 302 to the configured destination, with an empty body."""
    destination = os.environ.get("destination") or DEFAULT_DESTINATION
    return {"statusCode": 302, "body": "", "headers": {"Location": destination}}
