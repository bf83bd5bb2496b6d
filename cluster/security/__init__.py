"""Fleet security: the CA and certificates, TLS credentials that reload, and who may call what.

Every caller and every daemon has one certificate from the fleet CA. Its identity is a
URI SAN `studiofleet://ROLE/NAME` (unique per person, app and node: HIPAA 164.312(a)(2)(i));
daemons read role and name from it on every call. See docs/security.md.
"""
