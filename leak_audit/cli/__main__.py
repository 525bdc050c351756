from leak_audit.cli.main import main

raise SystemExit(main())
