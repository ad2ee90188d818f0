from kube_network_policies.cli import main

raise SystemExit(main())
