"""Where an image arrives: the DICOM listener, from the TCP/TLS socket to the acknowledgement.

The own Upper Layer (PS3.8) and its event loop, association negotiation, the DIMSE command
sets (PS3.7), the checks a data set passes before it is accepted, the Storage Commitment
reports destinations send back, and the MPPS SCP. An accepted image goes to
:mod:`node.store`.
"""
