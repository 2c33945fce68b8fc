"""Key material and identities: TLS certificates and SuperNode keys."""
