"""Fixtures for the object-storage tests of several folders: moto's S3 API server on 127.0.0.1, and an AWS
environment in which the SDK can reach nothing else."""

import pytest

DUMMY_AWS_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
}
# Variables of the developer's shell that would send the SDK to other credentials or another endpoint.
INHERITED_AWS_VARIABLES = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                           "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                           "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")


@pytest.fixture(scope="module")
def s3_endpoint():
    """Start moto's S3 server on 127.0.0.1 with a free port and return ``HOST:PORT``."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def aws_test_environment(monkeypatch, tmp_path):
    """Give the AWS SDK dummy credentials, and no profile, config file or other endpoint to find."""
    for name in INHERITED_AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in DUMMY_AWS_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent-aws-credentials"))
