"""Privacy at the site: DP-SGD with Opacus, the privacy ledger, site policy, CKKS encryption, signatures.

Heavy dependencies (opacus, tenseal) are imported by the submodules that use them.
"""
