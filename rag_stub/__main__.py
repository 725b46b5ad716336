from rag_stub.cli import main

raise SystemExit(main())
