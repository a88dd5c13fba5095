"""The conformance kit: `cycles conformance run` probes any Cycles server over HTTP and reports per requirement
of CONFORMANCE.md; `cycles conformance sdk` runs the client-recovery profile against our SDK. docs/conformance.md."""
