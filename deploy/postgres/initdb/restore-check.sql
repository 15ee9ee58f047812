-- The scratch database the ledger's nightly backup is test-restored into (deploy/compose/responder.yaml).
CREATE DATABASE responder_restore_check;
